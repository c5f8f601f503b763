"""The shapes world: a miniature, fully synthetic RLAIF-V setting trained on a CPU in minutes.

Images of coloured shapes with exact ground truth; a tiny LLaVA whose
reference model is SFT-trained on noisy captions (so it hallucinates) and on
yes/no questions (which it answers well) — the gap RLAIF-V's self-feedback
exploits. `rlaifv demo build` trains it; `rlaifv serve` serves it by default.
"""
