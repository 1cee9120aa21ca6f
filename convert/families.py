"""The transformer families this package reads: family name -> its layout module.

Every layout module (convert/flux.py, convert/flux2.py, convert/sd3.py) defines the same names; transformer loading
(convert/load.py), LoRA loading (convert/lora.py, convert/lora_formats.py) and the random
checkpoints (convert/synthetic.py) use nothing else of it:

| name | what |
|---|---|
| `NATIVE` | the official single file's layout ("bfl", "sai"); its keys are our attribute names |
| `NATIVE_PROBE` | a key only that layout has |
| `DIFFUSERS_CLASS` | the `_class_name` in a Diffusers transformer's config.json |
| `DIFFUSERS_PROBE` | a key only this family's Diffusers layout has |
| `DIFFUSERS_TEXT_ENCODERS` | Diffusers pipeline folder (`text_encoder_2`, ...) -> our encoder role |
| `PRESETS` | the named params of the family (from mmdit) |
| `params_from_native(ckpt)` | the params implied by native keys and shapes |
| `params_from_diffusers_config(config)` | the params of a Diffusers config.json (a dict) |
| `diffusers_keymap(params)` | the Diffusers -> ours `KeyMap` for a model of these params |
| `variant_name(params)` | the preset name, or what the params are like |

Adding a family: write its layout module with these names and list it here. Detection tries the
families in this order and takes the first whose probe key the file has: FLUX.2 comes before FLUX.1,
because a FLUX.2 file also has FLUX.1's probe key (Diffusers `loaders/single_file_utils.py`
`infer_diffusers_model_type` tests "flux-2-dev" before "flux-dev" for the same reason).
"""

from . import flux, flux2, sd3

FAMILIES = {"flux2": flux2, "flux": flux, "sd3": sd3}  # ordered: see above
