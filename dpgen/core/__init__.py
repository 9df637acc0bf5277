"""What every stage shares, below all of them: devices, public seeding, checkpoint files,
hashing and naming helpers, and the typed schemas of the files dpgen writes and reads back.

Nothing here knows a stage, a generator family or a privacy mechanism; stages (training,
sampling, evaluation, probes, report) import from here, never from each other's internals.

- `device`: `resolve_device("auto" | "cpu" | "cuda:N")`
- `seeding`: `step_generator(seed, step, stream)`, the one generator of every random stream
  (public ones here; the secret streams of `dpgen.privacy.randomness` are built on it)
- `checkpoints`: weights files (safetensors + the family and the spec that rebuild a network)
- `files`: sha256 / md5 of files
- `naming`: `class_name(k, class_names)`
- `schemas`: pydantic models of evaluation.json and probes_summary.json (writer and reader share them)
"""
