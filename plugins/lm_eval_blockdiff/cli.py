"""`blockdiff-lm-eval [lm_eval arguments]`: lm-eval's own command line, with this plugin's models (`blockdiff`,
`blockdiff-completions`) registered and its task folder on the include path; every argument is lm-eval's.

    blockdiff-lm-eval --model blockdiff --model_args pretrained=DIR,block_size=32,threshold=0.95 \\
        --tasks blockdiff_expressions,blockdiff_word_problems
"""

from __future__ import annotations

import sys

from lm_eval_blockdiff import TASKS_DIR


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        raise SystemExit("blockdiff-lm-eval: --include_path is set to this plugin's task folder "
                         f"({TASKS_DIR}); copy your tasks there or call lm_eval.simple_evaluate with a TaskManager")
    from lm_eval.__main__ import cli_evaluate

    import lm_eval_blockdiff.models  # noqa: F401  (registers the models)

    sys.argv = ["blockdiff-lm-eval", *argv, "--include_path", str(TASKS_DIR)]
    cli_evaluate()


if __name__ == "__main__":
    main()
