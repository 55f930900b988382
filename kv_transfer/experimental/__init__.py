"""Code serving never imports (a test checks): the transfer ticket and its ledger."""
