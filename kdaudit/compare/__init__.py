"""Audit from saved logits only: `kdaudit compare MANIFEST.csv --out DIR`.

manifest  the CSV listing each model's role, settings, seeds and logits file
files     .npy / .npz / .pt / .safetensors readers with bounded memory; top-k files
checks    shape, labels and pairing checks before anything is computed
cache     per-row metrics kept in DIR, reused while the files are unchanged
audit     metrics -> tidy run table -> kdaudit.stats.analyse -> kdaudit.report
"""

from kdaudit.compare.audit import CompareResult, compare
from kdaudit.compare.errors import CompareError
from kdaudit.compare.files import TopkFile, open_array, open_logits
from kdaudit.compare.manifest import Manifest, ModelRow, read_manifest

__all__ = [
    "CompareError",
    "CompareResult",
    "Manifest",
    "ModelRow",
    "TopkFile",
    "compare",
    "open_array",
    "open_logits",
    "read_manifest",
]
