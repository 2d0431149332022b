"""A benchmark workflow with no LLM: tasks hop through roles, to measure the runtime alone."""
