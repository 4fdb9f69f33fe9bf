"""Fakes of services that cannot run here, each following the real service's documented API."""
