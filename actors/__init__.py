"""The training runtime: coordinator and worker actors, plus the pure logic they use."""
