//! COM1: a 16550A UART (vm-superio) whose output goes to a line-buffered sink, and whose
//! interrupt line is an irqfd on GSI 4.
use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;

/// Raises IRQ 4 through KVM's irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Line-buffered console sink: the guest writes one byte per port exit; the host sees whole
/// lines in one write each (so readers timestamp lines, not bytes).
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl ConsoleOut {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleOut {
            out,
            line: Vec::with_capacity(256),
        }
    }

    /// Drops the unfinished line (it continues on the VM's new host).
    pub fn discard_partial(&mut self) {
        self.line.clear();
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.line.len() >= 4096 {
            self.write_out();
        }
        Ok(buf.len())
    }
    /// vm-superio flushes after every byte; lines go out whole, so this does nothing. The
    /// unfinished line is written by [`ConsoleOut::write_out`] when the VM ends.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleOut {
    /// Writes what is buffered, finished line or not.
    pub fn write_out(&mut self) {
        if !self.line.is_empty() {
            // A console that went away (closed pipe) must not stop the guest.
            let _ = self.out.write_all(&self.line);
            let _ = self.out.flush();
            self.line.clear();
        }
    }
}

/// Saved state of COM1 (version 1): the 16550 registers and the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub version: u32,
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
    /// Output of an unfinished line, so a line the guest is in the middle of when it is saved
    /// comes out whole wherever it is restored.
    pub pending_output: Vec<u8>,
}

/// Version of [`SerialState`] this code writes and reads.
pub const SERIAL_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("serial state version {0} is not supported (this Ferry reads {SERIAL_STATE_VERSION})")]
    Version(u32),
    #[error("serial state is invalid: {0}")]
    Invalid(String),
}

/// COM1 device.
pub struct Serial {
    uart: vm_superio::Serial<IrqLine, NoEvents, ConsoleOut>,
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqLine(irq), out),
        }
    }
    pub fn write(&mut self, offset: u8, v: u8) {
        // Errors here are the console sink's or the irqfd's; the guest cannot act on them.
        let _ = self.uart.write(offset, v);
    }
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
    pub fn flush(&mut self) {
        self.uart.writer_mut().write_out();
    }

    pub fn save(&mut self) -> SerialState {
        let vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
        } = self.uart.state();
        SerialState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer,
            pending_output: self.uart.writer_mut().line.clone(),
        }
    }

    pub fn discard_partial(&mut self) {
        self.uart.writer_mut().discard_partial();
    }

    /// Builds COM1 from saved state.
    pub fn from_state(
        s: &SerialState,
        irq: EventFd,
        mut out: ConsoleOut,
    ) -> Result<Self, SerialStateError> {
        if s.pending_output.len() > 4096 {
            return Err(SerialStateError::Invalid(
                "pending console output over 4 KiB".into(),
            ));
        }
        out.line = s.pending_output.clone();
        if s.version != SERIAL_STATE_VERSION {
            return Err(SerialStateError::Version(s.version));
        }
        let st = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&st, IrqLine(irq), NoEvents, out)
            .map_err(|e| SerialStateError::Invalid(format!("{e:?}")))?;
        Ok(Serial { uart })
    }
}
