"""The Textual chat screen (history, streamed replies, a status line with tokens/s, slash commands) and the
`llmctl chat` app that shows it; the training monitor opens the same screen on a run's checkpoint."""

from __future__ import annotations

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from llmctl.infer.chat_session import HELP, ChatSession
from llmctl.infer.decode import PromptTooLong


class Bubble(Static):
    DEFAULT_CSS = """
    Bubble { padding: 0 1; margin: 0 0 1 0; }
    Bubble.user { background: $primary-background; }
    Bubble.assistant { background: $panel; }
    Bubble.note { color: $text-muted; }
    """


class ChatScreen(Screen):
    BINDINGS = [
        ("ctrl+l", "reset", "clear conversation"),
        Binding("escape", "close", "back", show=False),
    ]

    def __init__(self, session: ChatSession, checkpoint: str, closable: bool = False) -> None:
        super().__init__()
        self.session, self.checkpoint = session, checkpoint
        self.closable = closable  # opened over another screen (the monitor): escape goes back to it
        self.busy = False

    def check_action(self, action: str, parameters: tuple) -> bool:
        return action != "close" or self.closable

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="history")
        yield Static(f"{self.checkpoint} · {HELP}", id="status")
        yield Input(placeholder="Message (or /help)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    def add(self, text: str, kind: str) -> Bubble:
        bubble = Bubble(text, classes=kind, markup=False)
        history = self.query_one("#history", VerticalScroll)
        history.mount(bubble)
        history.scroll_end(animate=False)
        return bubble

    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        event.input.value = ""
        if not text or self.busy:
            return
        if text.startswith("/"):
            if text.startswith("/reset"):
                self.query_one("#history").remove_children()
            self.add(self.session.command(text), "note")
            return
        self.add(text, "user")
        self.busy = True
        self.stream_reply(text, self.add("", "assistant"))

    def action_reset(self) -> None:
        self.session.command("/reset")
        self.query_one("#history").remove_children()

    def action_close(self) -> None:
        self.dismiss()

    @work(thread=True, exclusive=True)
    def stream_reply(self, text: str, bubble: Bubble) -> None:
        reply = ""
        try:
            for delta in self.session.reply(text):
                reply += delta
                self.app.call_from_thread(bubble.update, reply)
        except PromptTooLong as error:
            reply = f"error: {error}"
            self.app.call_from_thread(bubble.update, reply)
        self.app.call_from_thread(self.finish_reply, bubble, reply)

    def finish_reply(self, bubble: Bubble, reply: str) -> None:
        if not reply:
            bubble.update("(empty reply)")
        self.query_one("#status", Static).update(
            f"{self.checkpoint} · {self.session.last_tokens_per_second:.1f} tokens/s"
        )
        self.query_one("#history", VerticalScroll).scroll_end(animate=False)
        self.busy = False


class ChatApp(App):
    TITLE = "llmctl chat"

    def __init__(self, session: ChatSession, checkpoint: str) -> None:
        super().__init__()
        self.session, self.checkpoint = session, checkpoint

    def get_default_screen(self) -> Screen:
        return ChatScreen(self.session, self.checkpoint)
