"""Every on-disk format prunekit reads or writes, in one place; nothing outside this package knows a file name.

One module per format, each a registered :class:`~.base.Format` that detects, saves and loads it:

* :mod:`.dense` — the plain Hugging Face folder (safetensors), loadable anywhere;
* :mod:`.compressed` — prunekit's sparse format (:mod:`.compressed_read`, :mod:`.compressed_write`,
  byte layouts in :mod:`.codec`);
* :mod:`.structured` — structurally pruned models: plain when a stock config can say them
  (:mod:`.structured_plain`), else prunekit's per-block-widths folder;
* :mod:`.lowrank` — prunekit's factorized low-rank folder;
* :mod:`.gguf` — one file for llama.cpp (:mod:`.gguf_arch`, :mod:`.gguf_vocab`, :mod:`.gguf_read`,
  :mod:`.llamacpp`);
* :mod:`.activation` — activation-sparsity thresholds beside the weights of any of the above (an
  *overlay*: ``load_model`` installs them once the weights are loaded).

What they share: :mod:`.base` (the :class:`Format` type, the :data:`FORMATS` registry), :mod:`.load`
(``load_model``: asks each format which it is), :mod:`.sources` (alias / hub id / file / folder),
:mod:`.save` (choosing the format a save uses), :mod:`.sizes` (the report file and measured sizes),
:mod:`.atomic` (atomic folders), :mod:`.space` (free-space estimates), :mod:`.checksum`,
:mod:`.lazy` and :mod:`.shards` (reading and writing one block at a time), :mod:`.tokenizer_match`.
"""

from .activation import ACTIVATION, save_with_thresholds
from .atomic import OutputExistsError, atomic_folder, check_output_dir, reserve_output
from .base import FORMATS, Format, detect, detection_order, overlays
from .compressed import COMPRESSED
from .compressed_read import stored_dtype
from .dense import DENSE, save_merged, save_model
from .gguf import GGUF
from .load import LOAD_HOOKS, load_model, load_tokenizer, model_folder
from .lowrank import LOWRANK
from .save import (SAVE_FORMATS, check_save_format, choose, describe_streamed, finish_streamed, save_compressed,
                   save_folder)
from .sizes import REPORT_FILE, describe, model_bytes, read_report
from .sources import ModelSource, cache_root, resolve_source
from .space import check_save_space
from .structured import STRUCTURED

__all__ = ["ACTIVATION", "COMPRESSED", "DENSE", "FORMATS", "Format", "GGUF", "LOAD_HOOKS", "LOWRANK", "ModelSource",
           "OutputExistsError", "REPORT_FILE", "SAVE_FORMATS", "STRUCTURED", "atomic_folder", "cache_root",
           "check_output_dir", "check_save_format", "check_save_space", "choose", "describe", "describe_streamed",
           "detect", "detection_order", "finish_streamed", "load_model", "load_tokenizer", "model_bytes",
           "model_folder", "overlays", "read_report", "reserve_output", "resolve_source", "save_compressed",
           "save_folder", "save_merged", "save_model", "save_with_thresholds", "stored_dtype"]

