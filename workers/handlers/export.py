"""Export jobs: one model of the store as one GGUF file, kept in the model's own ``exports`` folder
(so deleting the model deletes its exports) and served by ``GET /models/{ref}/files/{name}``. With a
shared model store (``CSRA_MODEL_STORE_URL``) the file is published there too, for every host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from csra.jobctx import JobContext, JobError
from csra.settings import get_settings
from csra.specs import EXPORTS_DIR, ExportSpec
from models_store.registry import find_model_row, publish_export


def handle_export(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    from ml.export import export_gguf

    spec = ExportSpec.model_validate(params)
    row = find_model_row(spec.model_id)
    if row is None:
        raise JobError(f"model {spec.model_id!r} was deleted before its export ran")
    folder = Path(row["path"])
    out = folder / EXPORTS_DIR / spec.file_name

    def progress(fraction: float, stage: str) -> None:
        ctx.check_cancelled()  # raising here aborts the export and leaves no partial file
        ctx.progress(0.01 + 0.98 * fraction, stage)

    done = export_gguf(folder, out, spec.quantization, progress=progress)
    if get_settings().model_store_url:
        ctx.progress(0.99, "publishing to the model store")
        publish_export(row["name"], row.get("content_hash"), out)
    return {"model": row["name"], "file": out.name, "url": f"/models/{row['name']}/files/{out.name}",
            "format": spec.format, "quantization": done.quantization, "size_bytes": done.size_bytes,
            "sha256": done.sha256, "architecture": done.architecture, "lora_merged": done.lora_merged,
            "seconds": done.seconds}
