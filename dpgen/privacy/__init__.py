"""Differential-privacy accounting, reconstruction bounds, the privacy ledger and the `dpgen privacy` CLI."""
