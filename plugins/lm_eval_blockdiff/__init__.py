"""lm-evaluation-harness plugin (issue #18): block-diffusion models as lm-eval models, with their decoding cost (TPF,
NFE per token, tokens/s) beside each task's score, and offline tasks (`task_configs/`, functions in `tasks`).

lm-eval 0.4.13 finds models only in its own source tree (no plugin entry point), so this plugin is used through
`blockdiff-lm-eval` (lm-eval's own CLI with these models registered and `task_configs/` on the include path) or from
Python after `import lm_eval_blockdiff.models`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent / "task_configs"
