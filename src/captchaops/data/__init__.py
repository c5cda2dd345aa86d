"""Data in: folders of labelled images, generated CAPTCHAs, the stand-in, splits, digests, corrections."""
