"""One trainer per generator family (registered in `dpgen.models.registry.FAMILIES`).

Each family module has `pretrain(config, rd, public, image_shape, device, progress)` and
`finetune(config, rd, private, device, progress)`; the DP-SGD machinery they share lives in
`dpgen.training.dp`, the rest they share in `shared`.
"""
