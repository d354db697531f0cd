"""mnistgen: AE, VAE, GAN and WGAN-GP on MNIST; the library behind the DVC stages (mnistgen.stages)."""
