"""Everything a run can refuse before its work: before the model loads, and once it is loaded.

The messages name the CLI flags (``--out``, ``--seqlen`` …), as the rest of the library's do.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError


def check_json_path(path) -> None:
    """Fail now (not after the work) if the report JSON cannot be written to ``path``."""
    if not path:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--json {path!r} is a folder; give a file name such as report.json")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--json {path!r}: folder {str(parent)!r} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise ConfigError(f"--json {path!r} is not writable; choose another path")


def names(config) -> tuple[str, str]:
    """``(method, pattern)`` as the user gave them (a flat config), or as the family config reads."""
    from ..config import PruneConfig

    if isinstance(config, PruneConfig):
        return config.method, config.pattern
    front = _own(config).front()
    return front["method"], front["pattern"]


def target_sparsity(config) -> float | None:
    """The sparsity the config asks for (a low-rank budget: its fraction, as the report names it)."""
    own = _own(config)
    return own.sparsity if hasattr(own, "sparsity") else own.front()["sparsity"]


def _own(config):
    """The config itself, or the one a handler from ``families.prepare`` was built on."""
    from ..families import Family

    return config.config if isinstance(config, Family) else config


def check_before_loading(spec):
    """The checks that need no model; returns the compression handler (components built, once), or ``None``."""
    from ..data import get_dataset
    from ..families import prepare
    from ..families.base import check_holdout
    from ..formats import check_output_dir

    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    job = prepare(spec.compression) if spec.compression is not None else None  # names, options, compatibility
    calib = spec.calib
    drawn = spec.calib_ids is not None and spec.activation is None  # no calibration text is read
    for name in ([] if drawn else [calib.dataset]) + list(spec.eval_datasets):
        get_dataset(name, spec.data_dir, text_field=calib.text_field)
    if spec.out:
        check_output_dir(spec.out, spec.overwrite)
    check_json_path(spec.report_json)
    if spec.activation is not None and spec.offload == "disk":
        raise ConfigError("--activation-sparsity calibrates the whole model in memory: drop --offload disk")
    if spec.activation is not None and spec.activation.rotate != "none" and job is not None:
        raise ConfigError(f"--act-rotate {spec.activation.rotate} rotates dense weights, and this run also prunes "
                          "them (the rotation would make them dense again): drop --act-rotate, or drop the weight "
                          "pruning flags")
    if job is None:
        return None
    check_holdout(job.config, int(spec.calib_ids.shape[0]) if spec.calib_ids is not None else spec.calib.nsamples)
    if spec.save_format not in job.save_formats:
        raise ConfigError(job.save_format_refusal(spec.save_format))
    if not job.streams and spec.offload == "disk":
        raise ConfigError(f"--pattern {names(spec.compression)[1]} reshapes the model as a whole and needs it in "
                          "memory: use --offload none (or auto), or an unstructured / N:M pattern to stream")
    return job


def wants_streaming(spec) -> bool:
    """``offload="disk"``: yes; ``"none"``: no; ``"auto"``: when the model would not fit in memory."""
    if spec.offload == "disk":
        return True
    if spec.offload == "none" or not isinstance(spec.model, str):  # a model given in memory stays there
        return False
    from ..streaming import fits_in_memory

    return not fits_in_memory(spec.model, spec.dtype)


def check_streamable(spec, job, tasks: dict) -> None:
    """What a streamed run cannot do, refused before it opens the model."""
    if spec.activation is not None:
        raise ConfigError(f"{spec.model} does not fit in memory ({spec.dtype}), and --activation-sparsity "
                          "calibrates the whole model in memory: use --dtype bfloat16 or a machine with more memory")
    if not job.streams:
        raise ConfigError(f"{spec.model} does not fit in memory ({spec.dtype}), and --pattern "
                          f"{names(spec.compression)[1]} needs the whole model in memory: use an unstructured / N:M "
                          "pattern, which streams, or a machine with more memory")
    if spec.recover is not None:
        raise ConfigError("--recover trains the whole model in memory, so it cannot follow a streamed prune; "
                          "prune with --offload disk, then run prunekit recover where the model fits")
    if not spec.out:
        raise ConfigError("streaming (--offload disk, or a model too big for memory) writes the compressed blocks to "
                          "--out as they are done: give --out")
    check_streamable_tasks(tasks)
    if spec.merge_lowrank:
        raise ConfigError("--merge-lowrank is not available when streaming; save, then run prunekit export "
                          "--merge-lowrank where the model fits in memory")


def check_streamable_tasks(tasks: dict) -> None:
    """Log-likelihood tasks and perplexity stream; generation cannot (every token needs every block)."""
    bad = [spec for spec, t in tasks.items() if t.family not in ("multiple_choice", "perplexity")]
    if bad:
        raise ConfigError(f"task(s) {bad} generate text token by token, which needs the whole model in memory; a "
                          "streamed model can be scored on multiple-choice and perplexity tasks only")


def check_loaded(spec, job, model) -> None:
    """Everything about the loaded model that can fail, before the dense baseline and the prune."""
    from ..eval import check_seqlen
    from ..formats import check_save_space
    from ..models import check_finite

    check_finite(model)  # a NaN anywhere makes every number below meaningless
    if job is not None:
        linears = job.check(model)  # architecture x pattern, include/exclude, structured rounding
        if spec.out:  # a disk too small for the result is found now, not after the prune
            check_save_space(spec.out, model, spec.source, spec.save_format, target_sparsity(spec.compression),
                             job.removes_units,
                             linears)
        if job.needs_calibration:  # named by the flag the user gave
            check_seqlen(model, spec.calib.seqlen, "--seqlen")
    elif spec.out:  # activation sparsity alone: the weights are saved as they are
        check_save_space(spec.out, model, spec.source, spec.save_format, 0.0, False, {})
    if spec.activation is not None:
        from ..families import prepare

        prepare(spec.activation).check(model)  # cats/chess need a gated MLP: before the dense baseline
        check_seqlen(model, spec.activation.calib.seqlen, "--seqlen")
    if spec.eval_datasets:
        check_seqlen(model, spec.seqlen, spec.seqlen_flag)
