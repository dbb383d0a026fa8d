"""Zero-shot evaluation during training: the suite on every rank, each a share of every dataset (the metrics equal
one process's), in the precision the model trains in; under ZeRO-3 rank 0 evaluates a gathered plain copy."""
from __future__ import annotations

import os
from typing import Dict

import torch

from evaclip import dist as edist
from evaclip.data.transforms import make_tokenizer
from evaclip.encoders import Encoders
from evaclip.evalsuite import load_suite, run_suite, within, write_results
from evaclip.models import model_from_record, model_record


class Evaluator:
    """``evaluator(engine, step)`` -> {"zeroshot/<dataset>/<metric>": value}; {} when no suite is set."""

    def __init__(self, eval_cfg, model_cfg, variant, data_root: str, run_dir: str, device: torch.device, log,
                 extras: Dict = None):
        """``extras``: the objective's ``model_extras`` (a CoCa decoder, a distillation head): what rebuilds the
        trained model's plain copy under ZeRO-3."""
        self.cfg, self.model_cfg, self.variant, self.run_dir, self.device, self.log = \
            eval_cfg, model_cfg, variant, run_dir, device, log
        self.extras = extras or {}
        self.entries = load_suite(eval_cfg.suite) if eval_cfg.suite else None
        self.datasets_root = eval_cfg.datasets_root.replace("{root}", data_root)

    def __call__(self, engine, step: int) -> Dict[str, float]:
        if not self.entries:
            return {}
        out: Dict[str, float] = {}
        engine.train(False)
        model, dtype = engine.model, engine.input_dtype
        shard, gather = (edist.rank(), edist.world_size()), edist.all_gather_objects
        if engine.shards_params:
            # ZeRO-3: gather the weights (every rank), evaluate a plain copy on rank 0 without DeepSpeed's hooks
            shard, gather = (0, 1), None
            with engine.full_weights() as m:
                sd = {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} if edist.is_main() else None
            if edist.is_main():
                model = model_from_record(model_record(self.model_cfg, self.variant, self.extras))
                model.load_state_dict(sd)
                model.to(self.device).eval()
                dtype = torch.float32
        if edist.is_main() or gather is not None:
            v, c = self.variant, self.cfg
            # evaluated in the precision the model trains in
            enc = Encoders(within(engine.autocast, lambda x: model.encode_image(x.to(dtype), normalize=False)),
                           within(engine.autocast, lambda t: model.encode_text(t, normalize=False)),
                           make_tokenizer(v.context_length, self.model_cfg.text.kind, self.model_cfg.text.hf_path),
                           v.image_size, v.mean, v.std, v.interpolation, v.name, f"{self.run_dir}@step{step}",
                           identity="", module=model)  # the module: a CoCa's captions (suite task captioning)
            results = run_suite(enc, self.entries, self.datasets_root, self.device, c.batch_size, log=self.log,
                                workers=c.workers, shard=shard, gather=gather)
            if edist.is_main():
                write_results(results, os.path.join(self.run_dir, "eval", f"step-{step:08d}"))
            for r in results:
                for k, val in r["metrics"].items():
                    out[f"zeroshot/{r['dataset']}/{k}"] = val
        edist.barrier(f"the evaluation at step {step}")
        engine.train(True)
        return out
