"""What both fronts do, without a transport: validate and submit requests (the service), model
control (the registry of loaded units), request size limits, tensors to and from numpy."""
