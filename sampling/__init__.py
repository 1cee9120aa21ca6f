"""Text to image with the MM-DiT models: schedules, the Euler sampler, TACA's schedule, FLUX, FLUX.2 and SD3 pipelines."""

from .flux2 import Flux2Pipeline, flux2_sigmas
from .loading import default_model, load_pipeline
from .lora import load_pipeline_lora
from .pipeline import FluxPipeline, Pipeline, SD3Pipeline
from .sampler import NonFiniteError
from .schedules import flux_sigmas, given_sigmas, sd3_sigmas, shift_sigmas
from .taca import TacaSchedule

__all__ = [
    "Flux2Pipeline",
    "FluxPipeline",
    "NonFiniteError",
    "Pipeline",
    "SD3Pipeline",
    "TacaSchedule",
    "default_model",
    "flux2_sigmas",
    "flux_sigmas",
    "given_sigmas",
    "load_pipeline",
    "load_pipeline_lora",
    "sd3_sigmas",
    "shift_sigmas",
]
