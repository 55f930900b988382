"""Code serving never imports (a test checks): the NCCL transport and its pool, the transfer ticket and ledger."""
