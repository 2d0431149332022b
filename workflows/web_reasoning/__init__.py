"""Web reasoning extraction: filter and score web documents, then write a reasoning question and answer per document."""
