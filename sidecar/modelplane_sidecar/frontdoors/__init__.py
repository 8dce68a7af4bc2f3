"""Front doors for apps that speak another API than OpenAI's; each translates to and from it."""
