#include <stdio.h>

int main(void) {
  puts("iree stand-in");
  return 0;
}
