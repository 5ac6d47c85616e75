"""DiffPortrait360 back-end (DESIGN §6): models, converter, sampling, pipelines, stages.

Imports are lazy so that `import recon.diffusion` does not pull in diffusers/transformers.

    from recon.diffusion import Portrait360Pipeline, BackViewPipeline, diffusion_views
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # sampling
    "make_scheduler": "scheduling", "make_sampling": "scheduling", "OfficialDDIMSchedule": "scheduling",
    "DiffusersSampling": "scheduling", "q_sample": "scheduling", "guided_eps": "scheduling",
    "DP360_SCHEDULER_CONFIG": "scheduling",
    # windows
    "plan_windows": "windows", "windowed_eps": "windows", "WindowPlan": "windows",
    # pipelines
    "BackViewPipeline": "pipeline_backview", "PromptContext": "pipeline_backview",
    "DP360PipelineOutput": "pipeline_backview", "Portrait360Pipeline": "pipeline_360",
    # stages
    "diffusion_backview": "stage", "diffusion_views": "stage", "load_pipeline": "stage",
    "load_condition_ring": "stage", "background_key_alpha": "stage",
    # models (part A)
    "Denoiser": "denoiser", "convert_checkpoint": "convert", "load_models": "convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'recon.diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)
