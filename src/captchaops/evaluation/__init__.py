"""Measuring versions: the frozen evaluation sets, accuracy metrics, schemes, live evidence.

`evalset` (the frozen sets, stored by digest; scoring a version on one), `accuracy` (sequence
accuracy, CER, confusions), `scheme` (which versions and sets belong to the same kind of
CAPTCHA) and `evidence` (what the monitoring runs say about a candidate and its champion).
It reads the registry and decides nothing: the gate that judges with these numbers is
`decisions.gate`.
"""
