"""Tool-use workflow: a simulated customer, a support assistant whose tools run in sandboxes, a grader."""
