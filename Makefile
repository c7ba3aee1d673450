# The two commands of the README, and the pieces they are made of. Every target builds the venvs it needs first
# (tools/envs.py; seconds when they are current).
PYTHON ?= python3

.PHONY: demo test envs
demo:  ## the main job at toy scale: AR base -> WSD conversion -> decode HumanEval prompts, TPF printed
	$(PYTHON) tools/envs.py core
	$$($(PYTHON) tools/envs.py --path core) -m blockdiff.demo

test:  ## every test suite, each in its stack's venv
	$(PYTHON) tools/test.py

envs:  ## build (or check) every venv
	$(PYTHON) tools/envs.py all
