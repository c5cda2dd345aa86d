"""Judging versions: the frozen evaluation sets, accuracy metrics, schemes, live evidence, the gate.

`evalset` (the frozen sets, stored by digest; scoring a version on one), `accuracy` (sequence
accuracy, CER, confusions), `scheme` (which versions and sets belong to the same kind of
CAPTCHA), `evidence` (what the monitoring runs say about a candidate and its champion) and
`gate` (the continuous-deployment decision, written through `registry`).
"""
