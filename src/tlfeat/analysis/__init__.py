"""Analyses researchers run on cached features and on fine-tuning runs, beyond a classifier's accuracy.

`similarity`: CKA (linear and RBF, debiased) and RSA between representations of the same images.
`study`: the `tlfeat analyze cka|rsa|embed|neighbours` commands and `compare --analyses`, on the cache.
`views`: what each layer of a network sees (first-layer filters, activation maps of a photo).
`curves`: reading fine-tuning curves (overfitting).
`plots`: their figures.
"""
