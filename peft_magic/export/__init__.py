"""Export: the exported folder (adapter or merged model, loadable again) and its model card."""
