"""Collaborative reasoning: two LLM agents discuss a multiple-choice question until they agree."""
