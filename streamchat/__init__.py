"""StreamChat front ends that compose the core (appliance), the export stage (model_export) and the UI."""
