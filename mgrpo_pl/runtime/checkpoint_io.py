"""``StreamingCheckpointIO``: atomic checkpoint files without holding the whole checkpoint in memory twice.

Lightning's default writer serializes the checkpoint into an in-memory buffer and then writes ``getvalue()``, a second
copy: for the demo's 1.6 GB checkpoint that is the run's memory peak (+1 GB over training, measured with
``/usr/bin/time -v``), and for a 7B policy with AdamW it would be tens of GB. This writer streams ``torch.save`` into
a temporary file next to the target and renames it into place, which is just as atomic on a local filesystem: a
reader sees the old file or the new one, never a part. Remote paths (``s3://`` ...) keep Lightning's writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO


class StreamingCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves stream to a temporary file and rename it over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
