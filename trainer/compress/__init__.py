"""Communication compression: the FP8 (E4M3) codec. BF16 gradient sync lives with ZeRO-1
(``trainer.parallel.zero.bf16_a2a_sync``)."""
