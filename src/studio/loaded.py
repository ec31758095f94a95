"""What `load_pipeline` loaded, and how: one typed object that the app's functions take, instead of attributes stuck on
the diffusers pipeline or names searched in the human-readable list of what was applied."""

import dataclasses
from pathlib import Path
from typing import Any

from studio.modes import OffloadMode, QuantMode


@dataclasses.dataclass
class Loaded:
    pipe: Any  # the diffusers pipeline
    model_path: Path
    offload: OffloadMode  # the mode in effect ("auto" resolved)
    quant: QuantMode  # the storage and compute in effect (bf16 where a lossy mode could not apply)
    dtype: str  # "bfloat16" on CUDA, "float32" on the CPU
    demo: bool  # the tiny random demo model: its layers are noise
    optimizations: list[str] = dataclasses.field(default_factory=list)  # what was applied, by name, for logs and params
    machine: Any = None  # the budget mode's `MachinePlan`, made before loading
    stages: Any = None  # the budget engine's `BudgetStages` (which stage has the GPU)
    parallel: Any = None  # this rank's `ParallelState` with several GPUs
    cfg_hook: Any = None  # the CFG-parallel hook with several GPUs
    compiled: bool = False  # the transformer blocks run compiled
    caption_decoder: bool = False  # the caption decodes through `studio.caption` (CUDA graphs where they can run)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)  # the machine (`environment_info`)
    preset: str = "exact"  # --preset as it resolved: "fast" where its 8-bit mode applied (`studio.modes.PRESETS`)
    quantized: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the mode quantized (the 8-bit modes:
    #                                                                       blocks, kernel), for params.json
    models_dir: Path | None = None  # --models-dir: models fetched on first use go under it (the OCR's: studio.design)

    @property
    def lossy(self) -> bool:
        return self.quant.lossy

    def release_vram(self) -> None:
        """Budget mode: every weight back to its host copy and the allocator emptied (after a run or an error)."""
        if self.stages is not None:
            self.stages.release()

    def run_info(self) -> dict[str, Any]:
        """What every params.json records about the model and the machine besides the run's inputs."""
        versions = ("python", "torch", "cuda", "diffusers", "transformers", "gradio")
        return dict(model_path=str(self.model_path), offload_mode=self.offload.name, dtype=self.dtype,
                    quantization=self.quant.name, lossy=self.lossy, preset=self.preset,
                    quantized=dict(self.quantized) or None, optimizations=list(self.optimizations),
                    demo=self.demo, versions={key: self.environment.get(key) for key in versions},
                    gpu_name=self.environment.get("gpu_name"))
