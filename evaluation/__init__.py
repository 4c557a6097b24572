"""Anchor models and statistics that every evaluation run computes beside our model.

The anchors (online Markov chain, online popularity, SASRec, EASE, implicit ALS) are the reference
points a reader needs to judge a recall figure on a temporal split; computing them in the same run,
on the same events and exclusions, is what makes the comparison fair. Everything works on dense
integer item rows ``0..n_items-1`` and integer user rows (no string ids).
"""
