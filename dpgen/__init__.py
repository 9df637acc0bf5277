"""dpgen: differentially private synthetic medical-imaging cohorts.

    import dpgen
    summary = dpgen.run("configs/quickstart.yaml", "runs/quick")
    gen = dpgen.load("runs/quick")
    images, labels = gen.generate(100, seed=0)

Nothing heavy is imported here: `dpgen --help` and the CLI's errors answer without loading torch.
"""

__version__ = "0.1.0"

_CONFIG_NAMES = ("ConfigError", "RunConfig", "load_config")


def __getattr__(name: str):
    if name in _CONFIG_NAMES:
        from dpgen import config

        return getattr(config, name)
    raise AttributeError(f"module 'dpgen' has no attribute {name!r}")


def run(*args, **kwargs):
    """`dpgen.pipeline.run`: pretrain -> DP finetune -> sample in one run directory."""
    from dpgen.pipeline import run as _run

    return _run(*args, **kwargs)


def load(run_dir, device: str = "auto", stage: str | None = None):
    """`dpgen.sampling.load`: the DP fine-tuned generator of a run (`stage="pretrain"`: the public one)."""
    from dpgen.sampling import load as _load

    return _load(run_dir, device=device, stage=stage)


__all__ = ["ConfigError", "RunConfig", "load_config", "run", "load", "__version__"]
