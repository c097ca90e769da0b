"""Evaluation helpers: a string-match refusal detector and refusal-rate metrics with intervals.

``refusal_match`` labels a response as full refusal, partial refusal or compliance from fixed
phrases (no model needed); ``metrics`` turns per-response records (grader category plus the
string-match label) into per-model, per-prompt-set rates with bootstrap intervals, and
``deltas`` compares two such summaries.
"""
