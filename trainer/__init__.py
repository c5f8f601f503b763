"""The RLAIF-V trainer: AI feedback, preference pairs, DPO, the iterative loop, bundle export."""
