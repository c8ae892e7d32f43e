"""Labelled support messages for the classification and ranking tests (written for these tests)."""

from __future__ import annotations

TRAIN: list[tuple[str, str]] = [
    ("I was charged twice for my subscription this month", "billing"),
    ("Please refund the duplicate payment on my card", "billing"),
    ("The invoice shows the wrong VAT number", "billing"),
    ("Why did my monthly bill go up?", "billing"),
    ("Cancel my plan and stop charging my credit card", "billing"),
    ("I need a copy of last year's invoices for accounting", "billing"),
    ("I forgot my password and the reset link expired", "access"),
    ("After SSO I get sent back to the login page", "access"),
    ("Cannot log in, it says my account is locked", "access"),
    ("Two-factor code never arrives so I can't sign in", "access"),
    ("The password reset email does not arrive", "access"),
    ("Login fails with invalid credentials although the password is right", "access"),
    ("Someone changed my email address, I think my account was hacked", "security"),
    ("I got a phishing email pretending to be from you", "security"),
    ("There are logins from a country I have never visited", "security"),
    ("Please report a vulnerability in your API authentication", "security"),
    ("Suspicious activity: unknown device connected to my account", "security"),
    ("Our API key may have leaked on GitHub, please help", "security"),
    ("How do I export my reports as CSV?", "howto"),
    ("What are the API rate limits on the pro plan?", "howto"),
    ("How can I add a teammate to my workspace?", "howto"),
    ("Is there a way to schedule a report every Monday?", "howto"),
    ("Where do I change the language of the dashboard?", "howto"),
    ("Can I connect the app to Slack for notifications?", "howto"),
]

TEST: list[tuple[str, str]] = [
    ("You billed me two times for the same subscription, refund one please", "billing"),
    ("My invoice has an incorrect VAT id", "billing"),
    ("Stop charging my card, I want to cancel", "billing"),
    ("The reset link for my password has expired", "access"),
    ("I can't sign in, my account got locked", "access"),
    ("The two-factor SMS code never arrives", "access"),
    ("Received a phishing mail that looks like your company", "security"),
    ("Unknown logins from another country on my account, was it hacked?", "security"),
    ("How do I export the reports to CSV format?", "howto"),
    ("How to add a new teammate to the workspace", "howto"),
    ("Can notifications go to Slack?", "howto"),
]
