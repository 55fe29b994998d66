"""Benchmark: our clip_loss against open_clip's ClipLoss, forward + backward, side by side.

    python scripts/bench_loss.py [--batch 256 1024 4096] [--dim 512] [--repeats 20]
    python scripts/bench_loss.py --coca [--model coca_ViT-B-32] [--batch 16] [--repeats 3]

Prints milliseconds per call for both and their ratio (open_clip / ours: above 1 means ours is
faster), after checking that both give the same loss.

`--coca`: a whole CoCa training step's loss, forward + backward through the model, on COCO-style captions
(at most 14 tokens in the 76-token context): ours (`CocaLoss.terms` with the batch's `text_length`, the decoder
reading only as far as the longest caption) against open_clip's CoCa forward and `CoCaLoss` (the decoder over
the whole context), on the same weights.
"""

import argparse
import time

import open_clip
import torch
import torch.nn.functional as F

from multimodal.loss import clip_loss


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs playing with a frisbee in a grassy park.",
            "A kitchen with a stove, a sink and wooden cabinets.", "A plate of food with broccoli and rice."]


def coca(model_name: str, batch: int, repeats: int) -> None:
    from multimodal import arch
    from multimodal.data.batch import text_length
    from multimodal.loss import CocaLoss
    from multimodal.model import create_model

    torch.manual_seed(0)
    architecture = arch.load(model_name)
    model = create_model(architecture)
    tokens = architecture.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    images = torch.randn(batch, 3, architecture.image_size, architecture.image_size)
    length, reference = text_length(tokens), open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)

    def ours():
        return sum(CocaLoss(2.0).terms(model, images, tokens, gather=False, length=length).values())

    def theirs():
        out = model.towers(images, tokens)
        return sum(reference(out["image_features"], out["text_features"], out["logits"], out["labels"],
                             out["logit_scale"]))

    with torch.no_grad():
        torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-5)
    mine = timed(lambda: ours().backward(), repeats)
    other = timed(lambda: theirs().backward(), repeats)
    print(f"{model_name}, batch {batch}, captions of at most {length} of {tokens.shape[1]} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'ours ms':>9} {'open_clip ms':>13} {'ratio':>6}\n{mine:9.0f} {other:13.0f} {other / mine:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 256 1024 4096; --coca: 16")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None, help="default: 20; --coca: 3")
    parser.add_argument("--coca", action="store_true", help="a CoCa step's loss through the model (see above)")
    parser.add_argument("--model", default="coca_ViT-B-32", help="with --coca: the CoCa architecture")
    args = parser.parse_args()
    if args.coca:
        coca(args.model, (args.batch or [16])[0], args.repeats or 3)
        return
    args.batch, args.repeats = args.batch or [256, 1024, 4096], args.repeats or 20
    reference = open_clip.loss.ClipLoss()
    print(f"{'batch':>6} {'ours ms':>9} {'open_clip ms':>13} {'ratio':>6}")
    for n in args.batch:
        image = F.normalize(torch.randn(n, args.dim), dim=-1).requires_grad_()
        text = F.normalize(torch.randn(n, args.dim), dim=-1).requires_grad_()
        scale = torch.tensor(14.3, requires_grad=True)
        torch.testing.assert_close(clip_loss(image, text, scale), reference(image, text, scale))
        ours = timed(lambda: clip_loss(image, text, scale).backward(), args.repeats)
        theirs = timed(lambda: reference(image, text, scale).backward(), args.repeats)
        print(f"{n:>6} {ours:9.2f} {theirs:13.2f} {theirs / ours:6.2f}")


if __name__ == "__main__":
    main()
