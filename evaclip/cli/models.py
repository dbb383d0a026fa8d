"""``evaclip models``: the built-in model architectures (or your model files) with parameter counts."""
from __future__ import annotations

import os
import textwrap

from evaclip.cli.common import FORMATTER


def add_parser(sub) -> None:
    m = sub.add_parser("models", formatter_class=FORMATTER, help="list model architectures with parameter counts",
                       description=textwrap.dedent("""\
        List the built-in model architectures (launch/models/*.toml inside the package) with their parameter
        counts, or your own model files / folders of them:

          evaclip models
          evaclip models my_models/            # every *.toml in the folder
          evaclip models my_models/tiny.toml

        A model file is the architecture: image-tower kwargs as timm's Eva takes them ([vision]), the CLIP
        text tower ([text]), the embedding width, mean/std and interpolation ([preprocess]). Train one with
        model.name = "path/to/file.toml" (or model.model_dir = "folder" and model.name = "<file name>").
        """))
    m.add_argument("files", nargs="*", metavar="FILE_OR_DIR", help="model TOML files or folders of them")
    m.set_defaults(fn=cmd_models)


def cmd_models(args) -> int:
    import glob

    from evaclip.models import create_model, get_variant, list_models

    paths = []
    for p in args.files:
        paths += sorted(glob.glob(os.path.join(p, "*.toml"))) if os.path.isdir(p) else [p]
    print(f"{'model':<20} {'image':>8} {'patch':>5} {'width':>5} {'depth':>5} {'params':>10}  published  file")
    for name in paths or list_models():
        v = get_variant(name)
        m = create_model(v.name, v, device="meta")
        n = sum(p.numel() for p in m.parameters())
        pub = f"{v.published_params / 1e6:,.0f}M" if v.published_params else "-"
        vis = v.vision
        print(f"{v.name:<20} {v.image_size:>8} {vis['patch_size']:>5} {vis['embed_dim']:>5} {vis['depth']:>5} "
              f"{n / 1e6:>9,.1f}M  {pub:>9}  {name if paths else 'built-in'}")
        del m
    return 0
