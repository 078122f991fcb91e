"""Load tests (Locust) and the closed-loop benchmark client."""
