"""dpgen: differentially private synthetic medical-imaging cohorts.

    import dpgen
    summary = dpgen.run("configs/quickstart.yaml", "runs/quick")
    gen = dpgen.load("runs/quick")
    images, labels = gen.generate(100, seed=0)
"""

__version__ = "0.1.0"

from dpgen.config import ConfigError, RunConfig, load_config  # noqa: E402


def run(*args, **kwargs):
    from dpgen.pipeline import run as _run

    return _run(*args, **kwargs)


def load(run_dir, device: str = "auto"):
    from dpgen.sampling import load as _load

    return _load(run_dir, device=device)


__all__ = ["ConfigError", "RunConfig", "load_config", "run", "load", "__version__"]
