"""Distributed services agents call: LLM servers, sandboxes."""
