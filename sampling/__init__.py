"""Text to image with the MM-DiT models: schedules, the Euler sampler, TACA's schedule, FLUX and SD3 pipelines."""

from .loading import default_model, load_pipeline
from .lora import load_pipeline_lora
from .pipeline import FluxPipeline, Pipeline, SD3Pipeline
from .sampler import NonFiniteError
from .schedules import flux_sigmas, given_sigmas, sd3_sigmas, shift_sigmas
from .taca import TacaSchedule

__all__ = [
    "FluxPipeline",
    "NonFiniteError",
    "Pipeline",
    "SD3Pipeline",
    "TacaSchedule",
    "default_model",
    "flux_sigmas",
    "given_sigmas",
    "load_pipeline",
    "load_pipeline_lora",
    "sd3_sigmas",
    "shift_sigmas",
]
