"""Tests of the deployment artefacts (deploy/)."""
