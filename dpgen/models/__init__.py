"""Generators. Nothing here knows about privacy."""

from dpgen.models.diffusion import ConditionalDiffusion, DiffusionSpec

__all__ = ["ConditionalDiffusion", "DiffusionSpec", "diffusion_spec_from_config"]


def diffusion_spec_from_config(config, image_shape: tuple[int, ...]) -> DiffusionSpec:
    m = config.model
    return DiffusionSpec(
        spatial_dims=len(image_shape) - 1,
        in_channels=image_shape[0],
        num_classes=config.data.num_classes,
        channels=list(m.channels),
        attention_levels=list(m.attention_levels),
        num_res_blocks=m.num_res_blocks,
        num_head_channels=m.num_head_channels,
        norm_num_groups=m.norm_num_groups,
        num_train_timesteps=m.num_train_timesteps,
        image_shape=list(image_shape),
    )
