"""The rule-based reward model: rubrics written by people, and the grader that applies them.

``rubric`` holds the schema and validation (pure Python); ``prompt`` renders the grader's
input from a rubric and a (prompt, response) pair.
"""
