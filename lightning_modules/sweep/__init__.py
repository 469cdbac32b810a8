"""The guidance-sweep engine in pure torch (importing it imports no Lightning).

    config = SweepConfig(methods=["cfg", "cg_cond"], ...)          # validated settings
    models = SweepModels(load_diffusion(path), load_classifier(path))
    evaluation = build_evaluation(...)                                # extractor + reference statistics
    rows = run_sweep(config, models, evaluation, SweepStore(out_dir))

Callers: callbacks.GuidanceSweep (Lightning), `python -m experiments.sweep`, experiments.benchmark.
"""

from .config import DEFAULT_SCALES, SweepConfig
from .engine import Distributed, JobResult, SingleProcess, generate_images, run_job, run_sweep
from .evaluation import Evaluation, build_evaluation, check_extractor_available, resolve_extractor
from .loading import load_classifier, load_diffusion, resolve_guide
from .models import Network, SweepModels, check_compatible, weights_hash
from .planning import Job, plan_jobs, signature, signatures
from .store import COLUMNS, SweepStore, check_writable
from .tables import SUMMARY_COLUMNS, SUMMARY_TITLE, aggregate, format_table, summary

__all__ = [
    "COLUMNS", "DEFAULT_SCALES", "SUMMARY_COLUMNS", "SUMMARY_TITLE", "Distributed", "Evaluation", "Job",
    "JobResult", "Network", "SingleProcess", "SweepConfig", "SweepModels", "SweepStore", "aggregate",
    "build_evaluation", "check_compatible", "check_extractor_available", "check_writable", "format_table",
    "generate_images", "load_classifier", "load_diffusion", "plan_jobs", "resolve_guide", "resolve_extractor",
    "run_job", "run_sweep", "signature", "signatures", "summary", "weights_hash",
]
