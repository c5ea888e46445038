"""Context parallelism for NSA (a sequence split over CP ranks). Not implemented yet: see the CP issue."""
