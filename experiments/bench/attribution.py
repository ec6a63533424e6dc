"""attribution: integrated gradients (`--ig-steps`) at the last merge point through
`probes.attribution.path_shares` (captum LayerIntegratedGradients; captum directly on the model if that API does
not fit), on a Steps model: images/s and the efficiency against fwd+bwd images/s / steps (above 1 is possible:
layer IG back-propagates only to the merge point)."""
from __future__ import annotations

import time

import torch

from experiments.bench.harness import Setup, batch_for, build, interleave, log, optional, sync
from probes.runtime import LabeledImages, autocast, batches


def synthetic_images(n: int, input_size: tuple[int, ...], classes: int = 10) -> LabeledImages:
    """`n` random uint8 images as a LabeledImages, fine labels cycling through `classes`, two coarse classes."""
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (n, *input_size), generator=g, dtype=torch.uint8)
    fine = torch.arange(n) % classes
    f2c = [c * 2 // classes for c in range(classes)]
    c = input_size[0]
    return LabeledImages(images, fine, torch.tensor(f2c)[fine], fine_names=[f"f{i}" for i in range(classes)],
                         coarse_names=["c0", "c1"], fine_to_coarse=f2c, name="bench", split="test",
                         mean=(0.5,) * c, std=(0.5,) * c)


def run(name: str, n_images: int, n_steps: int, setup: Setup, notes: list[str]) -> dict | None:
    """IG images/s of Steps model `name` on `n_images` images; None (noted) without captum."""
    if optional("captum.attr", "attribution", notes) is None:
        return None
    built = build(name, setup)
    model, device = built.model.eval(), setup.device
    ds = synthetic_images(n_images, built.input_size, int(model.num_classes))
    batch_size, internal = 16, 256
    via = "probes.attribution.path_shares"
    delta_rel = None
    try:
        from probes.attribution import path_shares
        from probes.causal import merge_cut

        cut = merge_cut(model, ds.normalise(ds.images[:1]).to(device))

        def attribute(d):
            return path_shares(model, d, cut, level="fine", n_steps=n_steps, batch_size=batch_size,
                               internal_batch_size=internal, device=device, progress=False)
        attribute(ds.subset(range(min(2, n_images))))  # warm-up; also checks that the API fits
    except (ImportError, AttributeError, TypeError, ValueError, KeyError) as exc:
        via = f"captum LayerIntegratedGradients on the model ({type(exc).__name__} from probes.attribution: {exc})"
        notes.append(f"attribution: {via}")
        from captum.attr import LayerIntegratedGradients

        step = model.steps_stacks()[-1].steps[-1]
        lig = LayerIntegratedGradients(model, [step.y_prev, step.x] if step.y_prev is not None else [step.x])

        def attribute(d):
            for images, fine, _ in batches(d, batch_size, shuffle=False, device=device):
                lig.attribute(images, baselines=torch.zeros_like(images), target=fine, n_steps=n_steps,
                              internal_batch_size=max(internal, len(images)), return_convergence_delta=True)
        attribute(ds.subset(range(min(2, n_images))))
    sync(device)
    t0 = time.perf_counter()
    shares = attribute(ds)
    sync(device)
    dt = time.perf_counter() - t0
    if hasattr(shares, "summary"):
        delta_rel = shares.summary().get("delta.rel")
    # Reference: plain fwd+bwd (gradient to the input), batch 64: IG costs n_steps of these per image.
    xb, yb = batch_for(built, setup, batch=16 if setup.quick else 64)
    xb.requires_grad_()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        xb.grad = None
        with autocast(device):
            out = model(xb)
        out.gather(1, yb[:, None]).sum().backward()

    t = interleave({"fb": fwd_bwd}, setup, repeats=1 if setup.quick else 3, warmup=1)
    fb_ips = t.ips("fb", len(xb))
    ips = n_images / dt
    res = {"model": name, "images": n_images, "ig_steps": n_steps, "batch_size": batch_size,
           "internal_batch_size": internal, "via": via, "seconds": dt, "ips": ips, "fwd_bwd_ips": fb_ips,
           "efficiency": ips * n_steps / fb_ips, "fwd_bwd_batch": len(xb), "delta_rel": delta_rel}
    log(f"attribution: IG{n_steps} {ips:.2f} img/s (efficiency {res['efficiency']:.2f})")
    return res
